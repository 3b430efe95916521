//! The Ascend (Huawei NPU) path, behind the `ascend` feature: CoLD scoring and the batched LoRA
//! delta as sequences of aclnn operators ([`plan`]), and the ACL runtime found at run time
//! ([`runtime`]), so that the crate builds without the CANN toolkit.

pub mod plan;
pub mod runtime;
