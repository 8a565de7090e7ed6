// Command eden-control-plane runs a real Kubernetes API server for Eden's tests and demo:
// an embedded etcd and kube-apiserver (built from the upstream k8s.io/kubernetes module) in
// one process, with a generated CA, serving certificate and admin kubeconfig.
//
// By default it listens on loopback only and nothing else runs: objects are stored, validated
// and sent through admission webhooks exactly as in a cluster, but Pods never run. Tests run
// the Eden sidecar and operator as local processes with the kubeconfig this program writes.
// With --advertise-address it serves a real node instead (see node.go): listening on that
// address, reachable from pods, with ServiceAccount tokens and the kubernetes Service's
// endpoints; the same binary runs the node's other components.
//
// Usage:
//
//	eden-control-plane --dir DIR [--advertise-address IP] [--exit-on-stdin-close]
//	eden-control-plane kubelet|kube-proxy|kube-scheduler|kube-controller-manager [flags]
//
// It writes DIR/kubeconfig, prints one line "ready <kubeconfig path>" to stdout once the API
// server answers /readyz, and shuts etcd and the API server down on SIGTERM or SIGINT, or when
// its standard input closes (so a test harness that dies never leaves it behind).
package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	if len(os.Args) > 1 {
		if component, ok := nodeComponents[os.Args[1]]; ok {
			os.Exit(runComponent(component, os.Args[2:]))
		}
	}
	dir := flag.String("dir", "", "state directory: etcd data, certificates, kubeconfig (required)")
	watchStdin := flag.Bool("exit-on-stdin-close", false, "shut down when standard input reaches EOF")
	flag.StringVar(&advertiseAddress, "advertise-address", "",
		"serve a node: listen on this local address (not loopback) and advertise it to pods")
	flag.Parse()
	if *dir == "" {
		fail(fmt.Errorf("--dir is required"))
	}
	if err := run(*dir, *watchStdin); err != nil {
		fail(err)
	}
}

// advertiseAddress is the node's address when this control plane serves one, else empty.
var advertiseAddress string

func fail(err error) {
	fmt.Fprintf(os.Stderr, "eden-control-plane: %v\n", err)
	os.Exit(1)
}

func run(dir string, watchStdin bool) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	ports, err := freePorts(3)
	if err != nil {
		return fmt.Errorf("finding free loopback ports: %w", err)
	}
	etcdClientPort, etcdPeerPort, apiPort := ports[0], ports[1], ports[2]

	pki, err := writePKI(filepath.Join(dir, "pki"))
	if err != nil {
		return fmt.Errorf("generating certificates: %w", err)
	}

	etcd, err := startEtcd(filepath.Join(dir, "etcd"), etcdClientPort, etcdPeerPort)
	if err != nil {
		return fmt.Errorf("starting etcd: %w", err)
	}
	defer etcd.Close()

	apiURL := "https://" + listenAddress() + ":" + strconv.Itoa(apiPort)
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := writeKubeconfig(kubeconfig, apiURL, pki); err != nil {
		return err
	}

	cmd := app.NewAPIServerCommand()
	args := []string{
		"--etcd-servers=http://127.0.0.1:" + strconv.Itoa(etcdClientPort),
		"--secure-port=" + strconv.Itoa(apiPort),
		"--cert-dir=" + filepath.Join(dir, "apiserver-certs"),
		"--tls-cert-file=" + pki.servingCert,
		"--tls-private-key-file=" + pki.servingKey,
		"--client-ca-file=" + pki.caCert,
		"--token-auth-file=" + pki.tokenFile,
		"--service-cluster-ip-range=10.0.0.0/24",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + pki.serviceAccountKey,
		"--service-account-signing-key-file=" + pki.serviceAccountKey,
		"--authorization-mode=RBAC",
		"--allow-privileged=true",
		// Service references in webhook configurations resolve to endpoints (pod IPs on a
		// node), not ClusterIPs; tests without a node point webhooks at loopback URLs anyway.
		"--enable-aggregator-routing=true",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		"--v=0",
	}
	if advertiseAddress == "" {
		args = append(args,
			"--bind-address=127.0.0.1",
			"--advertise-address=127.0.0.1",
			// No controller-manager mints ServiceAccount tokens, so Pods would be rejected.
			"--disable-admission-plugins=ServiceAccount",
			// The "kubernetes" Service cannot point at a loopback address; nothing here needs it.
			"--endpoint-reconciler-type=none",
		)
	} else {
		args = append(args, nodeAPIServerArgs()...)
	}
	cmd.SetArgs(args)
	cmd.SilenceUsage = true

	done := make(chan error, 1)
	go func() { done <- cmd.Execute() }()

	if err := waitReady(apiURL, pki, done); err != nil {
		return err
	}
	fmt.Printf("ready %s\n", kubeconfig)

	if watchStdin {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			// The API server owns the signal context; a SIGTERM to ourselves is its clean stop.
			p, _ := os.FindProcess(os.Getpid())
			_ = p.Signal(os.Interrupt)
		}()
	}
	return <-done
}

// freePorts reserves n distinct loopback ports by binding them all at once, then releases them.
func freePorts(n int) ([]int, error) {
	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		listeners = append(listeners, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func startEtcd(dataDir string, clientPort, peerPort int) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = "eden"
	cfg.Dir = dataDir
	cfg.LogLevel = "error"
	clientURL := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(clientPort)}
	peerURL := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(peerPort)}
	cfg.ListenClientUrls = []url.URL{clientURL}
	cfg.AdvertiseClientUrls = []url.URL{clientURL}
	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	// Tests create and drop many objects; an unsynced disk is fine for throwaway state.
	cfg.UnsafeNoFsync = true

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case err := <-e.Err():
		e.Close()
		return nil, err
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("etcd not ready after 60s")
	}
}

// waitReady polls /readyz with the admin token until it answers 200, the server exits, or a
// minute passes.
func waitReady(apiURL string, pki *pkiFiles, done <-chan error) error {
	caPEM, err := os.ReadFile(pki.caCert)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	client := &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, apiURL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+pki.adminToken)
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case err := <-done:
			return fmt.Errorf("kube-apiserver exited before it was ready: %v", err)
		case <-ctx.Done():
			return fmt.Errorf("kube-apiserver not ready after 2 minutes")
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func randomToken() string {
	b := make([]byte, 24)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%x", b)
}
