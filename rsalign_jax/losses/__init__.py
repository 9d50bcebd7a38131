"""Retrieval losses as functions of global (B, D) embeddings, each with sharded variants (`impl`).

`impl='global'` is the plain reference (use it under jit: XLA partitions it, O(B^2/n) pair memory per device);
'gather' and 'ring' run it under shard_map over the mesh's batch axes ('data' x 'fsdp') with O(b B) and O(b^2)
(or O(b block_size)) pair memory, exact in value and gradient (see `collectives`). Modules: `contrastive` (CLIP
softmax), `sigmoid` (SigLIP), `triplet` (VSE0/VSE++, HVSA difficulty weighting, AMFMN dynamic margin), `uniformity`,
`labels` (SSJDN, CCNet), `hashing` (CCLS2T); `hvsa`, `amfmn`, `ccnet`, `ssjdn`, `ccls2t` and `clip` hold the
methods' `Objective`s (`config.loss_name`).
"""
