// librbd and librados, the C API (Debian's librbd-dev, librados-dev).
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
