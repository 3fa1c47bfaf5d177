"""The network layer over hivemind: joining the DHT (dht.py), admission (admission.py), the round's
all-reduce whose result every member verifiably agrees on (averaging.py, agreement.py), what reducers
report and how they bound a sender (binding.py, clipping.py), progress records, and the round-data RPC.
Every override of hivemind's internals is in hivemind/."""
