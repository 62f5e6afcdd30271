"""Faces: dlib detection, landmarks and identity embeddings (prep, keep-face, eval), and eval's face backends."""
