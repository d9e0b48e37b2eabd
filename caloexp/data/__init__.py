"""Shower data: file formats, the embedded simulator, downloads, transforms, loaders."""
