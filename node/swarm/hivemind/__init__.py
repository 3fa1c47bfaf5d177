"""Every override of hivemind's internals, in one place, checked against the installed hivemind on import.

- allreduce.py: ExactAllReduceRunner (members end bit-identical; a partial all-reduce fails; the reducer
  is swapped for ours);
- reducer.py: CheckedPartReducer (checks, weight cap, binding sketches) and ClippedSum, which replaces the
  reducer's accumulator tensor to clip each sender's part;
- averager.py: ExactAverager (admission on the averaging RPCs and in matchmaking, by swapping the class of
  the Matchmaking hivemind builds; reports of each all-reduce; state served and downloaded from admitted
  peers only; shutdown during a round);
- parts.py: the flat offset of each all-reduce part, read from its data pointer;
- codecs.py: 8-bit codecs that survive numpy 2, registered in hivemind's decoder registry;
- authorizer.py: our access token carried inside hivemind's, and pushed into the DHT process;
- offline.py: the all-reduce's reducers run without the network, for benchmarks (mirrors allreduce.py).

internals.py lists what each of them expects; tests/unit/test_hivemind_internals.py runs the same check.
"""

from node.swarm.hivemind.internals import require_internals

require_internals()
