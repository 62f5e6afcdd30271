"""`sdlora prep`: from a folder of ordinary photos to a clean, face-centred training set."""
