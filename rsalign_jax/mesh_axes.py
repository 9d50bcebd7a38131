"""The device mesh's axis names: `runtime.sharding` builds the mesh with them and the losses' collectives name the
batch axes with them, so neither imports the other."""
DATA_AXIS, FSDP_AXIS = "data", "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over both; collectives over the batch name both
