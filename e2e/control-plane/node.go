package main

// A real node's components, from the same pinned k8s.io/kubernetes module as the API server:
// one multi-call binary, so one Go build serves both the loopback control plane and the node
// (the node's packages add about a quarter to the control plane's build).

import (
	"net"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	cmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxyapp "k8s.io/kubernetes/cmd/kube-proxy/app"
	schedapp "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubeletapp "k8s.io/kubernetes/cmd/kubelet/app"
)

// nodeComponents are the commands the first argument selects instead of the control plane.
var nodeComponents = map[string]func() *cobra.Command{
	"kubelet":                 kubeletapp.NewKubeletCommand,
	"kube-proxy":              proxyapp.NewProxyCommand,
	"kube-scheduler":          func() *cobra.Command { return schedapp.NewSchedulerCommand() },
	"kube-controller-manager": cmapp.NewControllerManagerCommand,
}

func runComponent(component func() *cobra.Command, args []string) int {
	cmd := component()
	cmd.SetArgs(args)
	return cli.Run(cmd)
}

// listenAddress is where the API server listens: loopback, or on a node the advertised address
// (the pod network's gateway on the node), where pods reach it and nothing beyond the machine.
func listenAddress() string {
	if advertiseAddress == "" {
		return "127.0.0.1"
	}
	return advertiseAddress
}

// nodeAPIServerArgs are the API server's flags when it serves a node: pods reach it through the
// kubernetes Service (the default endpoint reconciler points it at the advertised address),
// the ServiceAccount admission plugin mounts their tokens, and logs and exec go to the node's
// InternalIP (its name does not resolve).
func nodeAPIServerArgs() []string {
	return []string{
		"--bind-address=" + advertiseAddress,
		"--advertise-address=" + advertiseAddress,
		"--kubelet-preferred-address-types=InternalIP,Hostname",
	}
}

// servingIPs are the addresses the API server's certificate is valid for: loopback, the
// kubernetes Service's ClusterIP and, on a node, the advertised address.
func servingIPs() []net.IP {
	ips := []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.0.0.1")}
	if advertiseAddress != "" {
		ips = append(ips, net.ParseIP(advertiseAddress))
	}
	return ips
}
