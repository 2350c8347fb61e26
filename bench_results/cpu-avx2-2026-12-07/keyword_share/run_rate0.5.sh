#!/bin/bash
cd /work/main; . /work/venv/bin/activate
start=$(date +%s)
/usr/bin/time -v mtr demo --out /tmp/s13/d5 config.tools.keyword_query_rate=0.5 grpo_pool=probe > /tmp/s13/d5.log 2> /tmp/s13/d5.err
echo "rc=$? wall=$(( $(date +%s) - start ))" >> /tmp/s13/d5.log
