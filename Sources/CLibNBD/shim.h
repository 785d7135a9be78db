// libnbd.h uses NULL without including <stddef.h>: include it first.
#include <stddef.h>
#include <sys/timerfd.h>
#include <libnbd.h>
