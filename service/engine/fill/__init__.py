"""Fill-mask: the job, its codec, the searches, the forward and the worker that batches them."""
