"""`vlmexport serve`: the browser demo, prefix_vlm.js and a bundle, plus POST /caption — a Starlette app on uvicorn, localhost by default."""
