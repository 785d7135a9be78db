// scripts/xenlab/xdp-pass.c — `xdp-pass IFNAME on|off`, for scripts/test-xen's
// domU (busybox has no ip-link xdp): `on` loads a two-instruction XDP program
// (r0 = XDP_PASS; exit) with bpf(2) and attaches it to IFNAME in driver mode
// with an rtnetlink RTM_SETLINK { IFLA_XDP { IFLA_XDP_FD, IFLA_XDP_FLAGS } };
// `off` detaches it (IFLA_XDP_FD -1). Linux's xen-netfront then asks its
// backend for rx headroom (xdp-headroom 256, Reconfiguring) or gives it back
// (0). Prints one line saying what happened; exit status 1 on any failure.
// Built static by scripts/test-xen: gcc -static -O2 -Wall -Werror.
#include <errno.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <linux/bpf.h>
#include <linux/if_link.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>

static int load_program(void) {
    struct bpf_insn insns[2];
    memset(insns, 0, sizeof insns);
    insns[0].code = BPF_ALU64 | BPF_MOV | BPF_K;   // r0 = XDP_PASS
    insns[0].dst_reg = BPF_REG_0;
    insns[0].imm = XDP_PASS;
    insns[1].code = BPF_JMP | BPF_EXIT;            // exit
    static char log[4096];
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.prog_type = BPF_PROG_TYPE_XDP;
    attr.insns = (uint64_t)(uintptr_t)insns;
    attr.insn_cnt = 2;
    attr.license = (uint64_t)(uintptr_t)"GPL";
    attr.log_buf = (uint64_t)(uintptr_t)log;
    attr.log_size = sizeof log;
    attr.log_level = 1;
    int fd = (int)syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof attr);
    if (fd < 0) {
        int e = errno;
        printf("xdp-pass: BPF_PROG_LOAD failed: %s; verifier: %s\n", strerror(e), log[0] ? log : "(no log)");
        return -1;
    }
    return fd;
}

// RTM_SETLINK on IFINDEX with IFLA_XDP { IFLA_XDP_FD = PROG, IFLA_XDP_FLAGS =
// DRV_MODE }; 0 or the negative errno of the kernel's ACK.
static int set_link_xdp(int ifindex, int prog, const char **why) {
    struct {
        struct nlmsghdr nh;
        struct ifinfomsg ifi;
        char attrs[64];
    } req;
    memset(&req, 0, sizeof req);
    req.nh.nlmsg_type = RTM_SETLINK;
    req.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    req.nh.nlmsg_seq = 1;
    req.ifi.ifi_family = AF_UNSPEC;
    req.ifi.ifi_index = ifindex;
    size_t len = NLMSG_LENGTH(sizeof req.ifi);
    struct nlattr *xdp = (struct nlattr *)((char *)&req + NLMSG_ALIGN(len));
    xdp->nla_type = NLA_F_NESTED | IFLA_XDP;
    struct nlattr *a = (struct nlattr *)((char *)xdp + NLA_HDRLEN);
    a->nla_type = IFLA_XDP_FD;
    a->nla_len = NLA_HDRLEN + sizeof(int32_t);
    int32_t fd = prog;
    memcpy((char *)a + NLA_HDRLEN, &fd, sizeof fd);
    a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len));
    a->nla_type = IFLA_XDP_FLAGS;
    a->nla_len = NLA_HDRLEN + sizeof(uint32_t);
    uint32_t flags = XDP_FLAGS_DRV_MODE;
    memcpy((char *)a + NLA_HDRLEN, &flags, sizeof flags);
    xdp->nla_len = (uint16_t)((char *)a + NLA_ALIGN(a->nla_len) - (char *)xdp);
    len = NLMSG_ALIGN(len) + xdp->nla_len;
    req.nh.nlmsg_len = (uint32_t)len;

    int s = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (s < 0) {
        *why = "socket(AF_NETLINK)";
        return -errno;
    }
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    if (sendto(s, &req, len, 0, (struct sockaddr *)&kernel, sizeof kernel) != (ssize_t)len) {
        int e = errno;
        close(s);
        *why = "sendto(netlink)";
        return -(e ? e : EIO);
    }
    // The ACK: an NLMSG_ERROR whose error is 0 (or the failure).
    char buf[8192];
    for (;;) {
        ssize_t n = recv(s, buf, sizeof buf, 0);
        if (n < 0) {
            int e = errno;
            if (e == EINTR) continue;
            close(s);
            *why = "recv(netlink)";
            return -e;
        }
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != 1) continue;
            if (h->nlmsg_type == NLMSG_ERROR) {
                const struct nlmsgerr *err = NLMSG_DATA(h);
                close(s);
                *why = "RTM_SETLINK IFLA_XDP";
                return err->error;   // 0: the ACK; else -errno
            }
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[2], "on") != 0 && strcmp(argv[2], "off") != 0)) {
        fprintf(stderr, "usage: xdp-pass IFNAME on|off\n");
        return 2;
    }
    const char *ifname = argv[1];
    int on = strcmp(argv[2], "on") == 0;
    unsigned ifindex = if_nametoindex(ifname);
    if (ifindex == 0) {
        printf("xdp-pass: no interface %s: %s\n", ifname, strerror(errno));
        return 1;
    }
    int prog = -1;
    if (on && (prog = load_program()) < 0) return 1;
    const char *why = "";
    int rc = set_link_xdp((int)ifindex, prog, &why);
    if (rc != 0) {
        printf("xdp-pass: %s %s on %s failed: %s\n", why, on ? "attach" : "detach", ifname, strerror(-rc));
        return 1;
    }
    // The link holds its own reference to the program: ours may go.
    if (prog >= 0) close(prog);
    if (on) {
        printf("xdp-pass: XDP_PASS program attached to %s (driver mode)\n", ifname);
    } else {
        printf("xdp-pass: XDP program detached from %s (driver mode)\n", ifname);
    }
    return 0;
}
