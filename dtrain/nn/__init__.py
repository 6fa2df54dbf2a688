"""The network: CS231n layers, recurrent cells (one module each), the captioning
model over a flat parameter buffer, and Adam. Nothing here knows of MPI, files
or configuration; array code is written once against ``xp``."""
