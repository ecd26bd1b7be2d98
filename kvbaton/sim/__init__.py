"""The simulator and capacity planner: the real scheduler, block pool, prefix index and router
policies on a virtual clock, with a cost model in place of the model runner (docs/sim.md)."""
