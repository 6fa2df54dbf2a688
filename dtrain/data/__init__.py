"""Data: the CS231n COCO layout (reader, vocabulary, decoding), the built-in
synthetic data set, import from the official COCO files, and BLEU."""
