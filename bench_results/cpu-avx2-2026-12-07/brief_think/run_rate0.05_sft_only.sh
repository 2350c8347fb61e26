#!/bin/bash
cd /work/main; . /work/venv/bin/activate
mtr demo --out /tmp/s15/bt05 tools.brief_think_rate=0.05 grpo_pool=probe > /tmp/s15/bt05.log 2> /tmp/s15/bt05.err &
pid=$!
while [ ! -d /tmp/s15/bt05/sft/checkpoints/8 ]; do sleep 10; if ! kill -0 $pid 2>/dev/null; then exit 1; fi; done
sleep 30; kill $pid; sleep 5
python bench_results/cpu-avx2-2026-12-07/brief_think/first_think_logp.py /tmp/s15/bt05 6 > /tmp/s15/bt05_logp.txt 2>&1
echo done >> /tmp/s15/bt05_logp.txt
