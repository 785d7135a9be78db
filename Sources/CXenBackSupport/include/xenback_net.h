// C glue for NetworkPlumbing: the TUN/TAP, bridge and interface ioctl
// numbers (built with _IOW/_IOR or hidden behind _GNU_SOURCE, so they do not
// import into Swift), the virtio-net header layout as the kernel's header
// declares it, and the few calls Swift's Glibc module does not show.
#ifndef XENBACK_NET_H
#define XENBACK_NET_H

#include <stddef.h>
#include <stdint.h>

// ---- TUN/TAP (<linux/if_tun.h>) ----
extern const unsigned long xb_TUNSETIFF;
extern const unsigned long xb_TUNGETIFF;
extern const unsigned long xb_TUNSETVNETHDRSZ;
extern const unsigned long xb_TUNGETVNETHDRSZ;
extern const unsigned long xb_TUNSETVNETLE;
extern const unsigned long xb_TUNSETOFFLOAD;
extern const unsigned long xb_TUNSETCARRIER;
extern const unsigned long xb_TUNSETPERSIST;
extern const unsigned long xb_TUNSETQUEUE;
extern const short xb_IFF_ATTACH_QUEUE;
extern const short xb_IFF_DETACH_QUEUE;
extern const short xb_IFF_TUN;
extern const short xb_IFF_TAP;
extern const short xb_IFF_NO_PI;
extern const short xb_IFF_VNET_HDR;
extern const short xb_IFF_MULTI_QUEUE;
extern const unsigned int xb_TUN_F_CSUM;
extern const unsigned int xb_TUN_F_TSO4;
extern const unsigned int xb_TUN_F_TSO6;
extern const unsigned int xb_TUN_F_TSO_ECN;

// ---- Interfaces and bridges (<linux/sockios.h>, <net/if.h>) ----
extern const unsigned long xb_SIOCGIFINDEX;
extern const unsigned long xb_SIOCGIFNAME;
extern const unsigned long xb_SIOCGIFFLAGS;
extern const unsigned long xb_SIOCSIFFLAGS;
extern const unsigned long xb_SIOCGIFMTU;
extern const unsigned long xb_SIOCSIFMTU;
extern const unsigned long xb_SIOCGIFHWADDR;
extern const unsigned long xb_SIOCSIFHWADDR;
extern const unsigned long xb_SIOCBRADDBR;
extern const unsigned long xb_SIOCBRDELBR;
extern const unsigned long xb_SIOCBRADDIF;
extern const unsigned long xb_SIOCBRDELIF;
extern const short xb_IFF_UP;
extern const int xb_IFNAMSIZ;
extern const unsigned short xb_ARPHRD_ETHER;

// ---- rtnetlink (<linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>) ----
extern const int xb_NETLINK_ROUTE;
extern const uint16_t xb_RTM_GETLINK;
extern const uint16_t xb_RTM_NEWLINK;
extern const uint16_t xb_NLMSG_ERROR;
extern const uint16_t xb_NLM_F_REQUEST;
extern const uint16_t xb_IFLA_MTU;
extern const uint16_t xb_IFLA_MASTER;
extern const uint16_t xb_IFLA_OPERSTATE;
extern const uint16_t xb_IFLA_CARRIER;
extern const size_t xb_sizeof_nlmsghdr;
extern const size_t xb_sizeof_ifinfomsg;
extern const size_t xb_sizeof_rtattr;

// ---- Namespaces (<sched.h> with _GNU_SOURCE, <sys/mount.h>) ----
extern const int xb_CLONE_NEWNET;
extern const int xb_CLONE_NEWNS;
extern const unsigned long xb_MS_REC;
extern const unsigned long xb_MS_SLAVE;
int xb_setns(int fd, int nstype);
int xb_unshare(int flags);

// ---- ioctl with a pointer or an integer argument (-1 and errno on failure) ----
int xb_ioctl_pointer(int fd, unsigned long request, void *argument);
int xb_ioctl_value(int fd, unsigned long request, unsigned long value);

// ---- struct virtio_net_hdr_v1 (<linux/virtio_net.h>) as the kernel declares it ----
extern const size_t xb_sizeof_virtio_net_hdr;          // legacy, without num_buffers (10)
extern const size_t xb_sizeof_virtio_net_hdr_v1;       // 12
extern const size_t xb_sizeof_virtio_net_hdr_mrg_rxbuf; // 12
extern const size_t xb_offsetof_vnet_flags;
extern const size_t xb_offsetof_vnet_gso_type;
extern const size_t xb_offsetof_vnet_hdr_len;
extern const size_t xb_offsetof_vnet_gso_size;
extern const size_t xb_offsetof_vnet_csum_start;
extern const size_t xb_offsetof_vnet_csum_offset;
extern const size_t xb_offsetof_vnet_num_buffers;
extern const uint8_t xb_VIRTIO_NET_HDR_F_NEEDS_CSUM;
extern const uint8_t xb_VIRTIO_NET_HDR_F_DATA_VALID;
extern const uint8_t xb_VIRTIO_NET_HDR_GSO_NONE;
extern const uint8_t xb_VIRTIO_NET_HDR_GSO_TCPV4;
extern const uint8_t xb_VIRTIO_NET_HDR_GSO_UDP;
extern const uint8_t xb_VIRTIO_NET_HDR_GSO_TCPV6;
extern const uint8_t xb_VIRTIO_NET_HDR_GSO_ECN;

#endif
