"""Runnable examples of onlinemix in other people's training code (``python -m onlinemix.examples.<name>``)."""
