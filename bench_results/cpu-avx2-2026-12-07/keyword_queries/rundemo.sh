#!/bin/bash
cd /work/main; . /work/venv/bin/activate
start=$(date +%s)
/usr/bin/time -v mtr demo --out /tmp/exp/demo1 > /tmp/exp/demo1.log 2> /tmp/exp/demo1.err
echo "rc=$? wall=$(( $(date +%s) - start ))" >> /tmp/exp/demo1.log
