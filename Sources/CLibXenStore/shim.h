#include <stdbool.h>
#include <stddef.h>
#include <xenstore.h>
