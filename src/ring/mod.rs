//! placeholder, replaced by the ring layer

/// Ring ABI (temporary, replaced by the ring layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abi {
    /// native
    Native,
    /// x86_32-abi
    X86_32,
    /// x86_64-abi
    X86_64,
}
