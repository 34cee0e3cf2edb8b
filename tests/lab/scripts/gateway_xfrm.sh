#!/bin/sh
# Lab script: show the gateway's kernel XFRM states and policies (run in the gateway netns).
echo "=== states"
ip xfrm state
echo "=== policies"
ip xfrm policy
