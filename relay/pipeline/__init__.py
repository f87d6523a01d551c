"""The execute pipeline's stages, one module each; `relay.app.execute` runs them in order."""
