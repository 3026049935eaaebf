package main

import (
	"encoding/binary"
	"fmt"
	"log"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// dhcpServer emulates DHCP on power-on: a VM NIC on a network with a configured range, that did
// not get a fixed address (guest customization, extraConfig SET.guest.ipAddress), gets the next
// free address of the range. Leases are stable per VM NIC and freed when the VM is destroyed.
//
// It is a simulator.RegisterObject handler: vcsim calls UpdateObject for every property change
// made through Registry.Update, which includes runtime.powerState on power-on (after the guest
// customization has been applied), with the VM locked.
type dhcpServer struct {
	self  types.ManagedObjectReference
	mu    sync.Mutex
	pools map[string]*dhcpPool
	// leases by VM NIC
	leases map[leaseKey]lease
}

type dhcpPool struct {
	network    string
	start, end uint32
	prefix     int32
	used       map[uint32]leaseKey
}

type leaseKey struct {
	vm  types.ManagedObjectReference
	nic int32 // device key
}

type lease struct {
	ip      uint32
	network string
}

func ipToUint(ip net.IP) (uint32, bool) {
	v4 := ip.To4()
	if v4 == nil {
		return 0, false
	}
	return binary.BigEndian.Uint32(v4), true
}

func uintToIP(n uint32) string {
	b := make([]byte, 4)
	binary.BigEndian.PutUint32(b, n)
	return net.IP(b).String()
}

// newDHCPServer parses "NET=START-END[/PREFIX],NET2=...".
func newDHCPServer(spec string) (*dhcpServer, error) {
	d := &dhcpServer{
		self:   types.ManagedObjectReference{Type: "KubegateDhcp", Value: "kubegate-dhcp"},
		pools:  map[string]*dhcpPool{},
		leases: map[leaseKey]lease{},
	}
	for _, entry := range strings.Split(spec, ",") {
		entry = strings.TrimSpace(entry)
		if entry == "" {
			continue
		}
		i := strings.LastIndex(entry, "=")
		if i <= 0 {
			return nil, fmt.Errorf("invalid -dhcp entry %q (want NETWORK=START-END)", entry)
		}
		name, rng := strings.TrimSpace(entry[:i]), strings.TrimSpace(entry[i+1:])
		prefix := int32(24)
		if j := strings.Index(rng, "/"); j >= 0 {
			p, err := strconv.Atoi(rng[j+1:])
			if err != nil || p < 0 || p > 32 {
				return nil, fmt.Errorf("invalid prefix length in -dhcp entry %q", entry)
			}
			prefix = int32(p)
			rng = rng[:j]
		}
		ends := strings.SplitN(rng, "-", 2)
		if len(ends) != 2 {
			return nil, fmt.Errorf("invalid -dhcp range %q (want START-END)", rng)
		}
		start, ok1 := ipToUint(net.ParseIP(strings.TrimSpace(ends[0])))
		end, ok2 := ipToUint(net.ParseIP(strings.TrimSpace(ends[1])))
		if !ok1 || !ok2 || end < start {
			return nil, fmt.Errorf("invalid -dhcp range %q (IPv4 START-END, START <= END)", rng)
		}
		if _, dup := d.pools[name]; dup {
			return nil, fmt.Errorf("-dhcp: network %q given twice", name)
		}
		d.pools[name] = &dhcpPool{network: name, start: start, end: end, prefix: prefix, used: map[uint32]leaseKey{}}
	}
	return d, nil
}

func (d *dhcpServer) Reference() types.ManagedObjectReference { return d.self }

func (d *dhcpServer) PutObject(mo.Reference) {}

func (d *dhcpServer) RemoveObject(ref types.ManagedObjectReference) {
	if ref.Type != "VirtualMachine" {
		return
	}
	// A move between folders is Remove+Put: only release once the VM is really gone.
	time.AfterFunc(250*time.Millisecond, func() {
		if simulator.Map.Get(ref) != nil {
			return
		}
		d.mu.Lock()
		d.releaseVM(ref)
		d.mu.Unlock()
	})
}

func (d *dhcpServer) UpdateObject(obj mo.Reference, changes []types.PropertyChange) {
	vm, ok := obj.(*mo.VirtualMachine)
	if !ok {
		return
	}
	for _, c := range changes {
		if c.Name == "runtime.powerState" {
			switch fmt.Sprint(c.Val) {
			case string(types.VirtualMachinePowerStatePoweredOn):
				d.poweredOn(vm)
			case string(types.VirtualMachinePowerStatePoweredOff):
				d.poweredOff(vm)
			}
		}
	}
}

func (d *dhcpServer) install() {
	simulator.Map.AddHandler(d)
	// VMs created powered on by the model (-vms N).
	for _, e := range simulator.Map.All("VirtualMachine") {
		if vm, ok := e.(*simulator.VirtualMachine); ok && vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn {
			simulator.Map.WithLock(vm, func() { d.poweredOn(&vm.VirtualMachine) })
		}
	}
}

// caller holds d.mu
func (d *dhcpServer) release(k leaseKey) {
	l, ok := d.leases[k]
	if !ok {
		return
	}
	if p := d.pools[l.network]; p != nil && p.used[l.ip] == k {
		delete(p.used, l.ip)
	}
	delete(d.leases, k)
}

// caller holds d.mu
func (d *dhcpServer) releaseVM(ref types.ManagedObjectReference) {
	for k := range d.leases {
		if k.vm == ref {
			d.release(k)
		}
	}
}

// caller holds d.mu
func (d *dhcpServer) purgeStale() {
	seen := map[types.ManagedObjectReference]bool{}
	for k := range d.leases {
		if _, done := seen[k.vm]; done {
			continue
		}
		gone := simulator.Map.Get(k.vm) == nil
		seen[k.vm] = gone
		if gone {
			d.releaseVM(k.vm)
		}
	}
}

// caller holds d.mu
func (d *dhcpServer) allocate(p *dhcpPool, k leaseKey) (uint32, bool) {
	for ip := p.start; ; ip++ {
		if _, used := p.used[ip]; !used {
			p.used[ip] = k
			d.leases[k] = lease{ip: ip, network: p.network}
			return ip, true
		}
		if ip == p.end {
			return 0, false
		}
	}
}

// nicNetwork returns the name of the network an ethernet card is backed by.
func nicNetwork(dev types.BaseVirtualDevice) (string, bool) {
	card, ok := dev.(types.BaseVirtualEthernetCard)
	if !ok {
		return "", false
	}
	switch b := card.GetVirtualEthernetCard().Backing.(type) {
	case *types.VirtualEthernetCardNetworkBackingInfo:
		if b.DeviceName != "" {
			return b.DeviceName, true
		}
		if b.Network != nil {
			return entityName(*b.Network), true
		}
	case *types.VirtualEthernetCardDistributedVirtualPortBackingInfo:
		ref := types.ManagedObjectReference{Type: "DistributedVirtualPortgroup", Value: b.Port.PortgroupKey}
		return entityName(ref), true
	case *types.VirtualEthernetCardOpaqueNetworkBackingInfo:
		return b.OpaqueNetworkId, true
	}
	return "", true
}

func (d *dhcpServer) poweredOn(vm *mo.VirtualMachine) {
	if vm.Config == nil || vm.Guest == nil {
		return
	}
	var changes []types.PropertyChange

	d.mu.Lock()
	{
		d.purgeStale()
		guestNet := make([]types.GuestNicInfo, len(vm.Guest.Net))
		copy(guestNet, vm.Guest.Net)
		oldLeaseIPs := map[string]bool{}
		for k, l := range d.leases {
			if k.vm == vm.Self {
				oldLeaseIPs[uintToIP(l.ip)] = true
			}
		}
		first := ""
		netChanged := false
		for _, dev := range vm.Config.Hardware.Device {
			network, isNIC := nicNetwork(dev)
			if !isNIC {
				continue
			}
			key := dev.GetVirtualDevice().Key
			idx := -1
			for i := range guestNet {
				if guestNet[i].DeviceConfigId == key {
					idx = i
					break
				}
			}
			if idx < 0 {
				continue
			}
			nic := &guestNet[idx]
			k := leaseKey{vm: vm.Self, nic: key}
			pool := d.pools[network]
			l, hasLease := d.leases[k]
			if hasLease && (pool == nil || l.network != network) {
				d.release(k)
				hasLease = false
			}
			if pool == nil {
				if network != "" && nic.Network != network {
					nic.Network = network
					netChanged = true
				}
				continue
			}
			var ip uint32
			if hasLease {
				if len(nic.IpAddress) > 0 && nic.IpAddress[0] != uintToIP(l.ip) {
					// The guest got a fixed address (customization) since: drop the lease.
					d.release(k)
					continue
				}
				ip = l.ip
			} else {
				if len(nic.IpAddress) > 0 {
					continue // fixed address from customization or SET.guest.ipAddress
				}
				var ok bool
				ip, ok = d.allocate(pool, k)
				if !ok {
					log.Printf("dhcp: range of %q exhausted, %s NIC %d gets no address", network, vm.Name, key)
					continue
				}
			}
			addr := uintToIP(ip)
			if first == "" {
				first = addr
			}
			nic.Network = network
			nic.IpAddress = []string{addr}
			nic.IpConfig = &types.NetIpConfigInfo{
				IpAddress: []types.NetIpConfigInfoIpAddress{{
					IpAddress:    addr,
					PrefixLength: pool.prefix,
					Origin:       string(types.NetIpConfigInfoIpAddressOriginDhcp),
					State:        string(types.NetIpConfigInfoIpAddressStatusPreferred),
				}},
				Dhcp: &types.NetDhcpConfigInfo{
					Ipv4: &types.NetDhcpConfigInfoDhcpOptions{Enable: true},
				},
			}
			netChanged = true
		}
		if netChanged {
			changes = append(changes, types.PropertyChange{Name: "guest.net", Val: guestNet})
			if first != "" && (vm.Guest.IpAddress == "" || oldLeaseIPs[vm.Guest.IpAddress]) {
				changes = append(changes,
					types.PropertyChange{Name: "guest.ipAddress", Val: first},
					types.PropertyChange{Name: "summary.guest.ipAddress", Val: first},
				)
			}
		}
	}
	d.mu.Unlock()

	// The guest (open-vm-tools) is up.
	changes = append(changes,
		types.PropertyChange{Name: "guest.toolsRunningStatus", Val: string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)},
		types.PropertyChange{Name: "guest.toolsStatus", Val: types.VirtualMachineToolsStatusToolsOk},
		types.PropertyChange{Name: "guest.guestState", Val: "running"},
		types.PropertyChange{Name: "summary.guest.toolsRunningStatus", Val: string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)},
		types.PropertyChange{Name: "summary.guest.toolsStatus", Val: types.VirtualMachineToolsStatusToolsOk},
	)
	// cloud-init's VMware datasource sets the hostname from guestinfo.metadata.
	if name := metadataHostname(vm.Config.ExtraConfig); name != "" && name != vm.Guest.HostName {
		changes = append(changes,
			types.PropertyChange{Name: "guest.hostName", Val: name},
			types.PropertyChange{Name: "summary.guest.hostName", Val: name},
		)
	}
	if vm.Summary.Guest == nil {
		vm.Summary.Guest = &types.VirtualMachineGuestSummary{}
	}
	simulator.Map.Update(vm, changes)
}

func (d *dhcpServer) poweredOff(vm *mo.VirtualMachine) {
	if vm.Guest == nil {
		return
	}
	if vm.Summary.Guest == nil {
		vm.Summary.Guest = &types.VirtualMachineGuestSummary{}
	}
	simulator.Map.Update(vm, []types.PropertyChange{
		{Name: "guest.toolsRunningStatus", Val: string(types.VirtualMachineToolsRunningStatusGuestToolsNotRunning)},
		{Name: "guest.toolsStatus", Val: types.VirtualMachineToolsStatusToolsNotRunning},
		{Name: "guest.guestState", Val: "notRunning"},
		{Name: "summary.guest.toolsRunningStatus", Val: string(types.VirtualMachineToolsRunningStatusGuestToolsNotRunning)},
		{Name: "summary.guest.toolsStatus", Val: types.VirtualMachineToolsStatusToolsNotRunning},
	})
}
