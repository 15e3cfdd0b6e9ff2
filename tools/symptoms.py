"""The bottleneck and symptom vocabulary shared by the profile summary and the wiki.

The profile tool emits these names; wiki pages list the ones they address in `symptoms`, so
a recommendation can link straight to the pages that treat it.
"""

BOTTLENECKS = {
    "dram_bandwidth": "DRAM bandwidth bound: memory throughput near peak, SM work low",
    "memory_latency": "memory latency bound: neither memory nor SM near peak, warps wait on loads",
    "compute_tensor": "tensor-pipe bound: tensor-core pipe near peak",
    "compute_pipe": "a non-tensor math pipe (FMA, ALU, FP64, XU) near peak",
    "issue_bound": "instruction issue bound: issue slots busy, many instructions per result",
    "launch_overhead": "launch overhead: kernel too short for its launch cost",
    "small_grid": "small grid: fewer blocks than the SMs can hold, latency exposed",
    "occupancy_limited": "occupancy limited by registers, shared memory or block size",
    "tail_effect": "tail effect: a partial last wave leaves SMs idle",
    "uncoalesced_global": "uncoalesced global access: many sectors per request",
    "shared_bank_conflicts": "shared-memory bank conflicts: many wavefronts per request",
    "local_memory": "local memory traffic: spills or run-time indexed per-thread arrays",
    "l2_bound": "L2 bandwidth bound: L2 throughput near peak",
    "no_tensor_cores": "matrix-shaped work issued on FMA pipes instead of tensor cores",
}

STALLS = {
    "stall_long_scoreboard": "waiting on global/local memory (L1TEX) results",
    "stall_short_scoreboard": "waiting on shared memory or special-function results",
    "stall_mio_throttle": "the memory input/output queue is full (shared memory, special math)",
    "stall_lg_throttle": "the local/global memory queue is full (too many narrow accesses)",
    "stall_barrier": "waiting at a block barrier (__syncthreads)",
    "stall_membar": "waiting on a memory barrier",
    "stall_math_pipe_throttle": "a math pipe is busy",
    "stall_wait": "fixed-latency dependency waits",
    "stall_not_selected": "eligible but another warp was picked (healthy when issue is busy)",
    "stall_selected": "issuing",
    "stall_branch_resolving": "waiting on a branch target",
    "stall_dispatch": "dispatch stall",
    "stall_no_instruction": "instruction cache miss or no instruction fetched",
    "stall_tex_throttle": "texture queue full",
    "stall_drain": "draining memory stores at exit",
    "stall_sleeping": "sleeping (nanosleep, yields)",
    "stall_imc_miss": "immediate constant cache miss",
}

SYMPTOMS = frozenset(BOTTLENECKS) | frozenset(STALLS)
