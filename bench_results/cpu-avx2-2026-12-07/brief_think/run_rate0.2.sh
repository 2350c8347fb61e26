#!/bin/bash
cd /work/main; . /work/venv/bin/activate
start=$(date +%s)
/usr/bin/time -v mtr demo --out /tmp/s15/bt20 tools.brief_think_rate=0.2 grpo_pool=probe > /tmp/s15/bt20.log 2> /tmp/s15/bt20.err
echo "rc=$? wall=$(( $(date +%s) - start ))" >> /tmp/s15/bt20.log
