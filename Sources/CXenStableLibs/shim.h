// Xen's stable userspace libraries for grant tables and event channels.
// Both headers include <xen/xen.h>, which refuses to parse unless
// __XEN_TOOLS__ is defined first (it guards the tools-only interfaces).
// libxentoolcore and libxentoollog are dependencies of both shared
// libraries (DT_NEEDED), so they need no link line here; <xentoollog.h> is
// used only for the logger struct below.
#ifndef XENBACKD_CXENSTABLELIBS_SHIM_H
#define XENBACKD_CXENSTABLELIBS_SHIM_H

#ifndef __XEN_TOOLS__
#define __XEN_TOOLS__ 1
#endif

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <xentoollog.h>
#include <xengnttab.h>
#include <xenevtchn.h>

// A logger that drops every message. Given a NULL logger, libxengnttab logs
// each failed map/copy to stderr ("xengnttab: error: mmap failed: ...");
// xenbackd reports those failures as typed errors instead. Never destroyed
// (the libraries destroy only the loggers they created themselves).
static void xb_xtl_quiet_vmessage(struct xentoollog_logger *logger, xentoollog_level level,
                                  int errnoval, const char *context, const char *format, va_list al) {
    (void)logger; (void)level; (void)errnoval; (void)context; (void)format; (void)al;
}
static void xb_xtl_quiet_destroy(struct xentoollog_logger *logger) { (void)logger; }
static inline struct xentoollog_logger *xb_xtl_quiet_logger(void) {
    static struct xentoollog_logger quiet = { xb_xtl_quiet_vmessage, NULL, xb_xtl_quiet_destroy };
    return &quiet;
}

#endif
