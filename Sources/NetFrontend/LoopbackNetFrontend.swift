// Our netfront for the loopback hypervisor.
