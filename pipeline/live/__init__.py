"""Live sessions: one media clock per session, frames due in real time, engines shared per device."""
