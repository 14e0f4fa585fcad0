"""`vlmexport site`: the browser demo and a bundle as a folder any static host serves as it is."""
