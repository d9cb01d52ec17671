#!/usr/bin/env python3
"""Replays a routing trace (`airllm run --trace-experts FILE`) through an expert cache of each
size, under two eviction policies, and prints the miss rate of each:

- lru: the least recently used expert goes (what `stream/experts.rs` does);
- lfu-aged: the expert with the lowest use count goes, counts halved every `--age` steps so
  that old popularity fades, recency breaking ties.

Like the engine's cache, slots are shared by all layers, and an expert the current layer uses
is never evicted for another of the same layer. The prompt's step (step 0) warms the cache and
is not counted.

    python3 bench/expert_policy.py trace.jsonl --slots 2,8,32,64
"""
import argparse
import json


def replay(trace, slots, policy, age):
    cache = {}  # key -> [last use, count]
    clock = 0
    misses = uses = 0
    last_aged = 0
    for rec in trace:
        step, layer = rec["step"], rec["layer"]
        if policy == "lfu-aged" and step - last_aged >= age:
            for v in cache.values():
                v[1] /= 2
            last_aged = step
        now = {(layer, e) for e in rec["experts"]}
        for key in sorted(now):
            clock += 1
            counted = step > 0
            uses += counted
            if key in cache:
                cache[key][0] = clock
                cache[key][1] += 1
                continue
            misses += counted
            if len(cache) >= slots:
                victims = [k for k in cache if k not in now]
                if not victims:
                    continue  # the layer runs in waves; the key is not kept
                if policy == "lru":
                    v = min(victims, key=lambda k: cache[k][0])
                else:
                    v = min(victims, key=lambda k: (cache[k][1], cache[k][0]))
                del cache[v]
            cache[key] = [clock, 1]
    return misses / max(uses, 1), uses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--slots", default="2,4,8,16,32,64")
    ap.add_argument("--age", type=int, default=16, help="steps between halvings of the counts")
    a = ap.parse_args()
    with open(a.trace) as f:
        trace = [json.loads(line) for line in f if line.strip()]
    layers = len({r["layer"] for r in trace})
    experts = max(e for r in trace for e in r["experts"]) + 1
    steps = max(r["step"] for r in trace)
    print(f"{a.trace}: {steps} decode steps, {layers} sparse layers, {experts} experts each")
    print("| slots | share of experts | lru miss rate | lfu-aged miss rate |")
    print("|---|---|---|---|")
    for s in (int(x) for x in a.slots.split(",")):
        lru, uses = replay(trace, s, "lru", a.age)
        lfu, _ = replay(trace, s, "lfu-aged", a.age)
        print(f"| {s} | {s / (layers * experts):.1%} | {lru:.3f} | {lfu:.3f} |")


if __name__ == "__main__":
    main()
