"""`vlmexport serve`: the browser demo, prefix_vlm.js and a bundle, plus POST /caption, on localhost."""
