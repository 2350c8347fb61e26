#!/bin/bash
cd /work/main; . /work/venv/bin/activate
start=$(date +%s)
/usr/bin/time -v mtr demo --out /tmp/s14/s5 config.sft.steps=5 > /tmp/s14/s5.log 2> /tmp/s14/s5.err
echo "rc=$? wall=$(( $(date +%s) - start ))" >> /tmp/s14/s5.log
