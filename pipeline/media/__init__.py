"""Media out: containers and encoders (MP4 files; later RTMP/FLV)."""
