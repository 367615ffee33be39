"""Beyond one node: the rendezvous, the synchronous all-reduce round and the sharded
asynchronous server. The only package (with the config) that knows about --nnodes."""
