"""Everything network- and person-facing: configuration, the CLI, the HTTP/WebRTC server."""
