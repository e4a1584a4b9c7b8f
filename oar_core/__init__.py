"""oar_core: the library behind the Ordered Autoregressive (OAR) image-generation pipeline."""
