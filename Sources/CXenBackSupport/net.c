#define _GNU_SOURCE
#include "xenback_net.h"
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <linux/if_tun.h>
#include <linux/sockios.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/if_link.h>
#include <linux/virtio_net.h>

const unsigned long xb_TUNSETIFF = TUNSETIFF;
const unsigned long xb_TUNGETIFF = TUNGETIFF;
const unsigned long xb_TUNSETVNETHDRSZ = TUNSETVNETHDRSZ;
const unsigned long xb_TUNGETVNETHDRSZ = TUNGETVNETHDRSZ;
const unsigned long xb_TUNSETVNETLE = TUNSETVNETLE;
const unsigned long xb_TUNSETOFFLOAD = TUNSETOFFLOAD;
const unsigned long xb_TUNSETCARRIER = TUNSETCARRIER;
const unsigned long xb_TUNSETPERSIST = TUNSETPERSIST;
const unsigned long xb_TUNSETQUEUE = TUNSETQUEUE;
const short xb_IFF_ATTACH_QUEUE = IFF_ATTACH_QUEUE;
const short xb_IFF_DETACH_QUEUE = IFF_DETACH_QUEUE;
const short xb_IFF_TUN = IFF_TUN;
const short xb_IFF_TAP = IFF_TAP;
const short xb_IFF_NO_PI = IFF_NO_PI;
const short xb_IFF_VNET_HDR = IFF_VNET_HDR;
const short xb_IFF_MULTI_QUEUE = IFF_MULTI_QUEUE;
const unsigned int xb_TUN_F_CSUM = TUN_F_CSUM;
const unsigned int xb_TUN_F_TSO4 = TUN_F_TSO4;
const unsigned int xb_TUN_F_TSO6 = TUN_F_TSO6;
const unsigned int xb_TUN_F_TSO_ECN = TUN_F_TSO_ECN;

const unsigned long xb_SIOCGIFINDEX = SIOCGIFINDEX;
const unsigned long xb_SIOCGIFNAME = SIOCGIFNAME;
const unsigned long xb_SIOCGIFFLAGS = SIOCGIFFLAGS;
const unsigned long xb_SIOCSIFFLAGS = SIOCSIFFLAGS;
const unsigned long xb_SIOCGIFMTU = SIOCGIFMTU;
const unsigned long xb_SIOCSIFMTU = SIOCSIFMTU;
const unsigned long xb_SIOCGIFHWADDR = SIOCGIFHWADDR;
const unsigned long xb_SIOCSIFHWADDR = SIOCSIFHWADDR;
const unsigned long xb_SIOCBRADDBR = SIOCBRADDBR;
const unsigned long xb_SIOCBRDELBR = SIOCBRDELBR;
const unsigned long xb_SIOCBRADDIF = SIOCBRADDIF;
const unsigned long xb_SIOCBRDELIF = SIOCBRDELIF;
const short xb_IFF_UP = IFF_UP;
const int xb_IFNAMSIZ = IFNAMSIZ;
const unsigned short xb_ARPHRD_ETHER = ARPHRD_ETHER;

const int xb_NETLINK_ROUTE = NETLINK_ROUTE;
const uint16_t xb_RTM_GETLINK = RTM_GETLINK;
const uint16_t xb_RTM_NEWLINK = RTM_NEWLINK;
const uint16_t xb_NLMSG_ERROR = NLMSG_ERROR;
const uint16_t xb_NLM_F_REQUEST = NLM_F_REQUEST;
const uint16_t xb_IFLA_MTU = IFLA_MTU;
const uint16_t xb_IFLA_MASTER = IFLA_MASTER;
const uint16_t xb_IFLA_OPERSTATE = IFLA_OPERSTATE;
const uint16_t xb_IFLA_CARRIER = IFLA_CARRIER;
const size_t xb_sizeof_nlmsghdr = sizeof(struct nlmsghdr);
const size_t xb_sizeof_ifinfomsg = sizeof(struct ifinfomsg);
const size_t xb_sizeof_rtattr = sizeof(struct rtattr);

const int xb_CLONE_NEWNET = CLONE_NEWNET;
const int xb_CLONE_NEWNS = CLONE_NEWNS;
const unsigned long xb_MS_REC = MS_REC;
const unsigned long xb_MS_SLAVE = MS_SLAVE;
int xb_setns(int fd, int nstype) { return setns(fd, nstype); }
int xb_unshare(int flags) { return unshare(flags); }

int xb_ioctl_pointer(int fd, unsigned long request, void *argument) { return ioctl(fd, request, argument); }
int xb_ioctl_value(int fd, unsigned long request, unsigned long value) { return ioctl(fd, request, value); }

const size_t xb_sizeof_virtio_net_hdr = sizeof(struct virtio_net_hdr);
const size_t xb_sizeof_virtio_net_hdr_v1 = sizeof(struct virtio_net_hdr_v1);
const size_t xb_sizeof_virtio_net_hdr_mrg_rxbuf = sizeof(struct virtio_net_hdr_mrg_rxbuf);
const size_t xb_offsetof_vnet_flags = offsetof(struct virtio_net_hdr_v1, flags);
const size_t xb_offsetof_vnet_gso_type = offsetof(struct virtio_net_hdr_v1, gso_type);
const size_t xb_offsetof_vnet_hdr_len = offsetof(struct virtio_net_hdr_v1, hdr_len);
const size_t xb_offsetof_vnet_gso_size = offsetof(struct virtio_net_hdr_v1, gso_size);
const size_t xb_offsetof_vnet_csum_start = offsetof(struct virtio_net_hdr_v1, csum_start);
const size_t xb_offsetof_vnet_csum_offset = offsetof(struct virtio_net_hdr_v1, csum_offset);
const size_t xb_offsetof_vnet_num_buffers = offsetof(struct virtio_net_hdr_v1, num_buffers);
const uint8_t xb_VIRTIO_NET_HDR_F_NEEDS_CSUM = VIRTIO_NET_HDR_F_NEEDS_CSUM;
const uint8_t xb_VIRTIO_NET_HDR_F_DATA_VALID = VIRTIO_NET_HDR_F_DATA_VALID;
const uint8_t xb_VIRTIO_NET_HDR_GSO_NONE = VIRTIO_NET_HDR_GSO_NONE;
const uint8_t xb_VIRTIO_NET_HDR_GSO_TCPV4 = VIRTIO_NET_HDR_GSO_TCPV4;
const uint8_t xb_VIRTIO_NET_HDR_GSO_UDP = VIRTIO_NET_HDR_GSO_UDP;
const uint8_t xb_VIRTIO_NET_HDR_GSO_TCPV6 = VIRTIO_NET_HDR_GSO_TCPV6;
const uint8_t xb_VIRTIO_NET_HDR_GSO_ECN = VIRTIO_NET_HDR_GSO_ECN;
