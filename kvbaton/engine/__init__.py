"""One worker's inference: requests, block pool, scheduler, model runner, attention, sampler."""
