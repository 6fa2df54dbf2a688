"""dtrain: data-parallel training of the CS231n image-captioning RNN/LSTM."""

__version__ = "0.1.0"
