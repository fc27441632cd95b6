"""How a lineage record names its stage, for those who read records (the catalog, model cards):
a stage that trains adapters is named after them ("sft-lora", `record.new_record`).

No imports: the checkpoint writer imports the catalog and the cards while `orchard.lineage` may
still be importing the checkpoint package."""

ADAPTER_METHODS = ("lora", "dora", "qlora", "adapter", "prefix")
"""`peft.method`'s values besides none (`orchard.peft.config.PeftConfig`)."""


def trains_adapters(stage: str) -> bool:
    return stage.rpartition("-")[2] in ADAPTER_METHODS
