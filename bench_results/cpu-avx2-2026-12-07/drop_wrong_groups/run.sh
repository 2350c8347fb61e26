#!/bin/bash
cd /work/main; . /work/venv/bin/activate
start=$(date +%s)
# (run as /tmp/exp/grpo3.py, byte-identical to ../length_penalty_and_probe/grpo_stage.py)
PROBE=/tmp/s13/d4/eval_probe.jsonl /usr/bin/time -v python bench_results/cpu-avx2-2026-12-07/length_penalty_and_probe/grpo_stage.py /tmp/s13/d4 /tmp/s14/dw config.tools.keyword_query_rate=0.4 grpo_pool=probe config.grpo.drop_wrong_groups=true config.grpo.drop_equal_groups=true > /tmp/s14/dw.log 2> /tmp/s14/dw.err
echo "rc=$? wall=$(( $(date +%s) - start ))" >> /tmp/s14/dw.log
