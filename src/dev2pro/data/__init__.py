"""Training data: image folders with captions and aspect buckets (`folders`), content-hash caches of latents and text
embeddings (`cache`), and the shards that trainers stream per rank (`shards`). Builds on `dev2pro.flux`."""
