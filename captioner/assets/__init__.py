"""Files that ship with the package: the bundled Flickr8k captioning model (``flickr8k.pt``, see README)."""
