// Command vcsim is kubegate's vCenter simulator: a thin wrapper around the
// govmomi 0.24 simulator (github.com/vmware/govmomi/simulator) that adds the
// behaviour kubegate's tests need (multiple users, real role/permission
// evaluation, NTP settings, shared/local datastores, a VM template, DHCP-like
// guest IPs, configurable version and a machine-readable ready signal).
//
// Build (offline, GOPATH mode): tools/vcsim/build.sh
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"log"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"

	// Register the vAPI (REST, /rest) and PBM (/pbm) simulator endpoints.
	_ "github.com/vmware/govmomi/pbm/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator"
)

// listFlag is a repeatable flag whose values may also be comma separated.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

type options struct {
	Listen          string
	Username        string
	Password        string
	PasswordFile    string
	Users           listFlag
	TLS             bool
	TLSCert         string
	TLSKey          string
	CertOut         string
	Version         string
	Build           string
	APIVersion      string
	Datacenters     int
	Clusters        int
	Hosts           int
	Datastores      int
	Networks        int
	Pools           int
	VMs             int
	PrintInventory  bool
	NTP             string
	NoNTPHosts      listFlag
	NoDRS           listFlag
	LocalDatastores listFlag
	Delay           int
	MethodDelay     string
	TaskDelay       string
	Jitter          float64
	Template        string
	DHCP            string
	ExtraPrivileges listFlag
	ReadyFile       string
	WatchPID        int
	Trace           bool
	Config          string
}

func newFlagSet(o *options) *flag.FlagSet {
	fs := flag.NewFlagSet("vcsim", flag.ContinueOnError)
	fs.StringVar(&o.Config, "config", "", "JSON file with flag values (keys are flag names); explicit command line flags win")
	fs.StringVar(&o.Listen, "listen", "127.0.0.1:8989", "address to listen on (port 0 picks a free port)")
	fs.StringVar(&o.Username, "username", "administrator@vsphere.local", "primary user (gets the Admin role on the root folder)")
	fs.StringVar(&o.Password, "password", "kubegate-dev-password", "password of the primary user")
	fs.StringVar(&o.PasswordFile, "password-file", "", "read the primary user's password from this file (its first line), keeping it off the command line")
	fs.Var(&o.Users, "users", "extra users that may log in, \"user@domain:password,...\" (repeatable)")
	fs.BoolVar(&o.TLS, "tls", true, "serve https with a self-signed certificate")
	fs.StringVar(&o.TLSCert, "tls-cert", "", "PEM certificate to use instead of a generated one (needs -tls-key)")
	fs.StringVar(&o.TLSKey, "tls-key", "", "PEM private key for -tls-cert")
	fs.StringVar(&o.CertOut, "cert-out", "", "write the server certificate (PEM) to this file")
	fs.StringVar(&o.Version, "version", "8.0.2", "about.version reported by ServiceContent")
	fs.StringVar(&o.Build, "build", "22617221", "about.build reported by ServiceContent")
	fs.StringVar(&o.APIVersion, "api-version", "", "about.apiVersion (default derived from -version, e.g. 8.0.2 -> 8.0.2.0, 6.5.0 -> 6.5)")
	fs.IntVar(&o.Datacenters, "datacenters", 1, "number of datacenters")
	fs.IntVar(&o.Clusters, "clusters", 2, "clusters per datacenter")
	fs.IntVar(&o.Hosts, "hosts", 3, "hosts per cluster")
	fs.IntVar(&o.Datastores, "datastores", 2, "shared datastores per datacenter (mounted on every host of the datacenter)")
	fs.IntVar(&o.Networks, "networks", 2, "distributed portgroups per datacenter (in addition to \"VM Network\")")
	fs.IntVar(&o.Pools, "pools", 1, "child resource pools per cluster")
	fs.IntVar(&o.VMs, "vms", 0, "powered-on VMs per cluster created by the model (besides the template)")
	fs.BoolVar(&o.PrintInventory, "print-inventory", false, "print one line per inventory object (type, inventory path) before the ready line")
	fs.StringVar(&o.NTP, "ntp", "", "comma separated NTP servers set on every host (config.dateTimeInfo.ntpConfig.server)")
	fs.Var(&o.NoNTPHosts, "no-ntp-host", "host name(s) left without NTP servers (repeatable or comma list)")
	fs.Var(&o.NoDRS, "no-drs", "compute cluster name(s) with DRS off (repeatable or comma list)")
	fs.Var(&o.LocalDatastores, "local-datastore", "NAME@HOSTNAME: extra datastore mounted on that host only (repeatable or comma list)")
	fs.IntVar(&o.Delay, "delay", 0, "delay in ms added to every SOAP method")
	fs.StringVar(&o.MethodDelay, "method-delay", "", "per-method delays in ms, e.g. \"CloneVM_Task=800,ReconfigVM_Task=100\"")
	fs.StringVar(&o.TaskDelay, "task-delay", "", "per-method task run time in ms: the task is returned running and completes after it, e.g. \"CloneVM_Task=1500,PowerOnVM_Task=200\" (\"*=MS\": every *_Task method)")
	fs.Float64Var(&o.Jitter, "jitter", 0, "delay jitter as coefficient of variation (stddev/mean), also applied to -task-delay")
	fs.StringVar(&o.Template, "template", "ubuntu-2204-kube-v1.30", "name of the VM template created in /DC0/vm/templates (empty: none)")
	fs.StringVar(&o.DHCP, "dhcp", "", "DHCP ranges per network, e.g. \"VM Network=10.20.0.100-10.20.0.199,DC0_DVPG0=10.21.0.100-10.21.0.199\"")
	fs.Var(&o.ExtraPrivileges, "extra-privileges", "additional privilege ids to add to privilegeList and the Admin role (repeatable or comma list)")
	fs.StringVar(&o.ReadyFile, "ready-file", "", "write a JSON ready file (atomically) once listening")
	fs.IntVar(&o.WatchPID, "watch-pid", 0, "exit when the process with this pid is gone")
	fs.BoolVar(&o.Trace, "trace", false, "trace SOAP requests and responses to stderr")
	return fs
}

// applyConfigFile sets every flag named in the JSON file that was not given on the command line.
func applyConfigFile(fs *flag.FlagSet, path string) error {
	data, err := ioutil.ReadFile(path)
	if err != nil {
		return err
	}
	var raw map[string]interface{}
	if err := json.Unmarshal(data, &raw); err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	explicit := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { explicit[f.Name] = true })

	keys := make([]string, 0, len(raw))
	for k := range raw {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, key := range keys {
		name := strings.ReplaceAll(key, "_", "-")
		if name == "config" {
			continue
		}
		if fs.Lookup(name) == nil {
			return fmt.Errorf("%s: unknown key %q", path, key)
		}
		if explicit[name] {
			continue
		}
		var values []string
		switch v := raw[key].(type) {
		case []interface{}:
			for _, x := range v {
				values = append(values, scalarString(x))
			}
		case map[string]interface{}:
			var parts []string
			for k, x := range v {
				parts = append(parts, k+"="+scalarString(x))
			}
			sort.Strings(parts)
			values = []string{strings.Join(parts, ",")}
		default:
			values = []string{scalarString(v)}
		}
		for _, s := range values {
			if err := fs.Set(name, s); err != nil {
				return fmt.Errorf("%s: %s: %v", path, key, err)
			}
		}
	}
	return nil
}

// readPasswordFile sets the primary password from -password-file (not with -password).
func readPasswordFile(fs *flag.FlagSet, o *options) error {
	if o.PasswordFile == "" {
		return nil
	}
	explicit := false
	fs.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "password" })
	if explicit {
		return fmt.Errorf("give -password or -password-file, not both")
	}
	data, err := ioutil.ReadFile(o.PasswordFile)
	if err != nil {
		return fmt.Errorf("-password-file: %v", err)
	}
	password := strings.TrimRight(strings.SplitN(string(data), "\n", 2)[0], "\r")
	if password == "" {
		return fmt.Errorf("-password-file %s: the first line is empty", o.PasswordFile)
	}
	o.Password = password
	return nil
}

func scalarString(v interface{}) string {
	switch x := v.(type) {
	case nil:
		return ""
	case string:
		return x
	case bool:
		return strconv.FormatBool(x)
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64)
	default:
		return fmt.Sprint(x)
	}
}

func parseMethodDelay(s string) (map[string]int, error) {
	m := map[string]int{}
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		kv := strings.SplitN(part, "=", 2)
		if len(kv) != 2 {
			return nil, fmt.Errorf("invalid -method-delay entry %q (want Method=ms)", part)
		}
		ms, err := strconv.Atoi(strings.TrimSpace(kv[1]))
		if err != nil || ms < 0 {
			return nil, fmt.Errorf("invalid -method-delay entry %q", part)
		}
		m[strings.TrimSpace(kv[0])] = ms
	}
	return m, nil
}

// userTable holds the name/password pairs that may log in.
type userTable struct {
	primary string
	users   map[string]string // normalized principal -> password
	names   []string          // names as given (primary first)
}

func newUserTable(o *options) (*userTable, error) {
	t := &userTable{primary: o.Username, users: map[string]string{}}
	if o.Username == "" || o.Password == "" {
		return nil, fmt.Errorf("-username and -password must not be empty")
	}
	t.users[normalizePrincipal(o.Username)] = o.Password
	t.names = append(t.names, o.Username)
	for _, entry := range o.Users {
		i := strings.Index(entry, ":")
		if i <= 0 || i == len(entry)-1 {
			return nil, fmt.Errorf("invalid -users entry %q (want user@domain:password)", entry)
		}
		name, pass := entry[:i], entry[i+1:]
		t.users[normalizePrincipal(name)] = pass
		t.names = append(t.names, name)
	}
	return t, nil
}

func (t *userTable) valid(name, password string) bool {
	if name == "" || password == "" {
		return false
	}
	pass, ok := t.users[normalizePrincipal(name)]
	return ok && pass == password
}

// deriveAPIVersion maps a product version to the apiVersion vCenter reports.
func deriveAPIVersion(version string) string {
	parts := strings.Split(version, ".")
	nums := make([]int, 0, 3)
	for _, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil {
			return version
		}
		nums = append(nums, n)
	}
	for len(nums) < 3 {
		nums = append(nums, 0)
	}
	major, minor, patch := nums[0], nums[1], nums[2]
	if major >= 7 {
		return fmt.Sprintf("%d.%d.%d.0", major, minor, patch)
	}
	if patch == 0 {
		return fmt.Sprintf("%d.%d", major, minor)
	}
	return fmt.Sprintf("%d.%d.%d", major, minor, patch)
}

type readyInfo struct {
	URL              string         `json:"url"`
	Host             string         `json:"host"`
	Port             int            `json:"port"`
	TLS              bool           `json:"tls"`
	ThumbprintSHA256 *string        `json:"thumbprint_sha256"`
	ThumbprintSHA1   *string        `json:"thumbprint_sha1"`
	Version          string         `json:"version"`
	Build            string         `json:"build"`
	APIVersion       string         `json:"api_version"`
	Username         string         `json:"username"`
	Users            []string       `json:"users"`
	Template         string         `json:"template,omitempty"`
	TaskDelay        map[string]int `json:"task_delay"`
	CertFile         string         `json:"cert_file,omitempty"`
	PID              int            `json:"pid"`
}

func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := ioutil.TempFile(dir, "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return err
	}
	tmp := f.Name()
	if _, err = f.Write(data); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp, 0600) // private, like everything under the kubegate home
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
	}
	return err
}

func main() {
	log.SetFlags(log.LstdFlags)
	log.SetPrefix("vcsim: ")
	if err := run(os.Args[1:]); err != nil {
		log.Printf("error: %v", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	o := &options{}
	fs := newFlagSet(o)
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return nil
		}
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if o.Config != "" {
		if err := applyConfigFile(fs, o.Config); err != nil {
			return err
		}
	}
	if err := readPasswordFile(fs, o); err != nil {
		return err
	}
	if o.Datacenters < 1 || o.Clusters < 1 || o.Hosts < 1 {
		return fmt.Errorf("-datacenters, -clusters and -hosts must be >= 1")
	}
	if o.Datastores < 1 {
		return fmt.Errorf("-datastores must be >= 1")
	}
	if o.Networks < 0 || o.Pools < 0 || o.VMs < 0 || o.Delay < 0 || o.Jitter < 0 {
		return fmt.Errorf("negative values are not allowed")
	}
	methodDelay, err := parseMethodDelay(o.MethodDelay)
	if err != nil {
		return err
	}
	taskDelay, err := parseTaskDelay(o.TaskDelay)
	if err != nil {
		return err
	}
	users, err := newUserTable(o)
	if err != nil {
		return err
	}
	dhcp, err := newDHCPServer(o.DHCP)
	if err != nil {
		return err
	}
	if o.APIVersion == "" {
		o.APIVersion = deriveAPIVersion(o.Version)
	}
	simulator.Trace = o.Trace

	host, port, err := net.SplitHostPort(o.Listen)
	if err != nil {
		return fmt.Errorf("-listen %q: %v", o.Listen, err)
	}
	if host == "" {
		host = "127.0.0.1"
	}

	// --- inventory ---
	registerDirectoryUsers(users)
	sim, err := buildInventory(o)
	if err != nil {
		return err
	}
	defer sim.cleanup()

	authz, err := installAuthorizationManager(o, users)
	if err != nil {
		return err
	}
	_ = authz

	dhcp.install()

	delays := newTaskDelayer(taskDelay, o.Jitter)
	delays.install()
	if delays.active() {
		installWaitCollector()
		log.Printf("task delays: %s", delays.describe())
	}

	// Delays start only now, so that building the inventory is not slowed down.
	sim.model.DelayConfig.Delay = o.Delay
	sim.model.DelayConfig.MethodDelay = methodDelay
	sim.model.DelayConfig.DelayJitter = o.Jitter

	// --- server ---
	var tlsInfo *certInfo
	svc := sim.model.Service
	svc.Listen = &url.URL{Host: net.JoinHostPort(host, port)}
	svc.RegisterEndpoints = true
	if o.TLS {
		tlsInfo, err = loadOrGenerateCert(o, host)
		if err != nil {
			return err
		}
		svc.TLS = tlsInfo.config
		if o.CertOut != "" {
			if err := writeFileAtomic(o.CertOut, tlsInfo.pem); err != nil {
				return fmt.Errorf("-cert-out: %v", err)
			}
		}
	}

	server := svc.NewServer()
	server.Config.Handler = newFrontHandler(server.Config.Handler, users, sim, delays, o.APIVersion)
	server.Config.ErrorLog = log.New(os.Stderr, "vcsim http: ", log.LstdFlags)

	addr := server.Listener.Addr().(*net.TCPAddr)
	readyHost := host
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		readyHost = "127.0.0.1"
	}
	scheme := "http"
	if o.TLS {
		scheme = "https"
	}
	sdkURL := fmt.Sprintf("%s://%s/sdk", scheme, net.JoinHostPort(readyHost, strconv.Itoa(addr.Port)))

	out := bufio.NewWriter(os.Stdout)
	if o.PrintInventory {
		if err := printInventory(out, sim.client); err != nil {
			return err
		}
	}

	info := readyInfo{
		URL:        sdkURL,
		Host:       readyHost,
		Port:       addr.Port,
		TLS:        o.TLS,
		Version:    o.Version,
		Build:      o.Build,
		APIVersion: o.APIVersion,
		Username:   o.Username,
		Users:      users.names,
		Template:   sim.templatePath,
		TaskDelay:  delays.copyDelays(),
		CertFile:   o.CertOut,
		PID:        os.Getpid(),
	}
	line := "vcsim ready url=" + sdkURL
	if tlsInfo != nil {
		info.ThumbprintSHA256 = &tlsInfo.sha256
		info.ThumbprintSHA1 = &tlsInfo.sha1
		line += " thumbprint-sha256=" + tlsInfo.sha256
	}
	if o.ReadyFile != "" {
		data, _ := json.MarshalIndent(info, "", "  ")
		if err := writeFileAtomic(o.ReadyFile, append(data, '\n')); err != nil {
			server.Close()
			return fmt.Errorf("-ready-file: %v", err)
		}
	}
	fmt.Fprintln(out, line)
	if err := out.Flush(); err != nil {
		log.Printf("stdout: %v", err)
	}

	// --- wait for a signal (or the watched process to go away) ---
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	done := make(chan string, 1)
	if o.WatchPID > 0 {
		go func() {
			for {
				time.Sleep(time.Second)
				if err := syscall.Kill(o.WatchPID, 0); err == syscall.ESRCH {
					done <- fmt.Sprintf("watched pid %d is gone", o.WatchPID)
					return
				}
			}
		}()
	}
	select {
	case s := <-sigs:
		log.Printf("received %s, shutting down", s)
	case why := <-done:
		log.Printf("%s, shutting down", why)
	}
	signal.Stop(sigs)

	if o.ReadyFile != "" {
		_ = os.Remove(o.ReadyFile)
	}
	closed := make(chan struct{})
	go func() {
		// Close waits for outstanding requests (e.g. WaitForUpdates long polls): bound it.
		server.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(2 * time.Second):
	}
	return nil
}

// internalClient returns an in-process client of the simulator (no HTTP, no session needed).
func internalClient(svc *simulator.Service) (*vim25.Client, error) {
	return vim25.NewClient(context.Background(), svc)
}
