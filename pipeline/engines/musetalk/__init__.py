"""MuseTalk v1.5 engine (shared/MUSETALK_V15.md): official weights, PyTorch, any device.

Modules, smallest first:

- :mod:`.loader`     official file layout -> diffusers/transformers models, strict shape checks
- :mod:`.synthetic`  random checkpoints in the official layout (tests, GPU benchmarks)
- :mod:`.features`   Whisper audio tokens: the literal whole-file path and a streaming featurizer
- :mod:`.vae_cache`  per-avatar VAE latents, cached beside the avatar, keyed by the VAE's hash
- :mod:`.engine`     :class:`~pipeline.engines.musetalk.engine.MuseTalkEngine`
- :mod:`.ct2_whisper` reads a CTranslate2 Whisper encoder into Hugging Face layout (benchmarks)

Nothing here is imported by ``pipeline.engines`` until the engine is asked for, so the default
install never needs torch.
"""
