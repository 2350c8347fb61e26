#!/bin/bash
cd /work/main; . /work/venv/bin/activate
start=$(date +%s)
/usr/bin/time -v mtr demo --out /tmp/s13/d4 config.tools.keyword_query_rate=0.4 grpo_pool=probe > /tmp/s13/d4.log 2> /tmp/s13/d4.err
echo "rc=$? wall=$(( $(date +%s) - start ))" >> /tmp/s13/d4.log
