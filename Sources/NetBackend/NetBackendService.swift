// The vif driver lives here (see docs/ARCHITECTURE.md).
