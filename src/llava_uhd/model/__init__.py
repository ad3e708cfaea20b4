"""The LLaVA-UHD model: vision encoder, resampler, language-model glue and weight loading."""
