"""Audio in: decoding, resampling, voice activity and per-video-frame windows."""
