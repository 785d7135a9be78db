// librbd and librados, the C API (Debian's librbd-dev, librados-dev): types
// and declarations only, for LibRBD's dlopen.
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <dlfcn.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
