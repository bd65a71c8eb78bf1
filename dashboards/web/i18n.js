// Labels in Chinese (the default: the operators are Chinese city staff) and English, and the
// switch between them (remembered in localStorage). Domain words (rules, states, kinds,
// metrics, health) are translated here too; unknown keys fall back to the key itself.

const LANG_KEY = 'citywatch.lang';

const zh = {
  'app.title': '城市安全运行监测', 'app.subtitle': '一网统管',
  'nav.ops': '运行指挥', 'nav.map': '城市地图', 'nav.health': '设备健康', 'nav.maintenance': '维保计划',
  'map.title': '城市地图', 'map.fit': '全部站点', 'map.tiles': '瓦片地址', 'map.apply': '应用', 'map.datum': '瓦片坐标系',
  'map.datum.wgs84': 'WGS-84 瓦片', 'map.datum.gcj02': 'GCJ-02 瓦片（国内地图）', 'map.noTiles': '无底图 · 坐标 WGS-84',
  'map.noIncident': '无进行中事件', 'map.healthRing': '外圈：设备健康异常',
  'map.datumNote': '清单坐标为 WGS-84（GPS），使用 GCJ-02 底图时自动转换。',
  'map.empty': '没有带坐标的设备：在设备清单中填写 lat、lon 两列（WGS-84）后导入。',
  'map.count': '{sites} 个站点 · {devices} 台设备有坐标 · {unplaced} 台无坐标', 'map.devices': '{n} 台设备',
  'common.system': '系统',
  'note.now': '级别升至{severity}', 'note.since': '条件自 {at} 起成立', 'note.command': '下发指令：{cmd} {id}',
  'note.flapping': '反复触发与恢复，暂缓推送状态翻转，待稳定后恢复', 'note.escalated': '第 {n} 级升级',
  'cmd.close_valve': '关闭切断阀', 'cmd.self_test': '自检', 'cmd.silence': '消音', 'cmd.set_interval': '设置上报间隔',
  'live.connecting': '连接中', 'live.live': '实时', 'live.reconnecting': '重连中', 'live.offline': '已断开',
  'sound.on': '声音：开', 'sound.off': '声音：关',
  'auth.title': '登录', 'auth.hint': '此网关需要访问令牌。请输入管理员分配的令牌。', 'auth.token': '访问令牌',
  'auth.submit': '登录', 'auth.logout': '退出', 'auth.wrong': '令牌无效，请重试。', 'auth.forbidden': '当前令牌无权执行此操作。',
  'common.dismiss': '知道了', 'common.cancel': '取消', 'common.confirm': '确认', 'common.all': '全部',
  'common.none': '暂无', 'common.loading': '加载中…', 'common.error': '出错', 'common.search': '搜索设备、站点…',
  'common.site': '站点', 'common.kind': '类型', 'common.device': '设备', 'common.total': '合计',
  'ops.newCritical': '新的紧急事件', 'ops.board': '事件看板', 'ops.critical': '紧急未受理', 'ops.open': '待受理',
  'ops.acknowledged': '已受理', 'ops.dispatched': '处置中', 'ops.review': '待审核',
  'ops.filter.active': '进行中', 'ops.filter.unclosed': '未结案', 'ops.filter.closed': '已结案',
  'ops.empty': '当前没有事件。', 'ops.col.severity': '级别', 'ops.col.incident': '事件', 'ops.col.state': '状态',
  'ops.col.value': '数值 / 阈值', 'ops.col.opened': '发生时间', 'ops.col.actions': '操作',
  'ops.detail': '事件详情', 'ops.history': '处置记录', 'ops.chart': '触发前后读数', 'ops.noMetric': '此事件没有关联读数。',
  'ops.count': '次数', 'ops.escalation': '升级', 'ops.flapping': '抖动抑制中', 'ops.crew': '处置队伍', 'ops.summary': '摘要',
  'ops.updated': '更新于',
  'action.ack': '受理', 'action.dispatch': '派遣', 'action.resolve': '处置完成', 'action.close': '结案',
  'action.actor': '操作人', 'action.crew': '处置队伍', 'action.note': '备注', 'action.done': '已提交',
  'action.conflict': '状态已变化，无法执行：',
  'health.title': '设备健康', 'health.bySite': '按站点和类型统计', 'health.devices': '设备列表',
  'health.inspectionDue': '检验到期', 'health.col.id': '设备编号', 'health.col.health': '健康状态',
  'health.col.battery': '电池', 'health.col.rssi': '信号', 'health.col.lastSeen': '最后上报', 'health.col.reading': '最新读数',
  'health.detail': '设备详情', 'health.range': '时间范围', 'health.incidents': '相关事件', 'health.noData': '该时段无数据',
  'health.fw': '固件', 'health.interval': '上报间隔', 'health.firstSeen': '首次上报', 'health.location': '位置',
  'health.installDate': '安装日期', 'health.shown': '显示', 'health.of': '/',
  'maint.title': '维保计划', 'maint.overdue': '已逾期', 'maint.due30': '30 天内到期', 'maint.later': '之后到期（最近）',
  'maint.fallback': '维保接口暂不可用：到期日按安装日期 + 12 个月推算（无安装日期时按首次上报日期）。',
  'maint.fromApi': '数据来自维保接口', 'maint.col.task': '任务', 'maint.col.due': '到期日', 'maint.col.daysLeft': '剩余天数',
  'maint.col.crew': '责任班组', 'maint.col.phone': '电话', 'maint.col.last': '上次检验', 'maint.col.basis': '推算依据',
  'maint.basis.install': '安装日期', 'maint.basis.firstSeen': '首次上报', 'maint.nothing': '30 天内没有到期或逾期的项目。',
  'maint.days': '天', 'maint.daysOver': '逾期 {n} 天',
  'task.inspection': '年度检验', 'task.calibration': '标定', 'task.cleaning': '清洁', 'task.replacement': '更换', 'task.siren_season': '试鸣季检查',
  'range.1h': '1 小时', 'range.6h': '6 小时', 'range.24h': '24 小时', 'range.7d': '7 天', 'range.30d': '30 天',
  'time.justNow': '刚刚', 'time.s': '{n} 秒前', 'time.m': '{n} 分钟前', 'time.h': '{n} 小时前', 'time.d': '{n} 天前',
  'severity.critical': '紧急', 'severity.major': '重要', 'severity.warning': '警告', 'severity.info': '提示',
  'state.open': '待受理', 'state.acknowledged': '已受理', 'state.dispatched': '已派遣', 'state.resolved': '已处置',
  'state.cleared': '已自行恢复', 'state.closed': '已结案', 'state.escalated': '已升级', 'state.renotified': '再次通知',
  'state.updated': '数值更新', 'state.reminder': '提醒', 'state.command': '下发指令', 'state.command_acked': '指令已确认',
  'state.reopened': '重新打开', 'state.severity': '级别变化', 'state.flapping': '抖动抑制', 'state.condition_cleared': '条件已恢复', 'state.command_unanswered': '指令未确认',
  'rule.gas_low': '燃气浓度一级报警', 'rule.gas_high': '燃气浓度二级报警', 'rule.gas_valve_failed': '切断阀未关闭',
  'rule.device_alarm': '设备报警', 'rule.smoke': '烟雾报警', 'rule.heat': '温度报警', 'rule.fire_confirmed': '火情确认',
  'rule.mount_tilt': '警报器支架倾斜', 'rule.mount_corrosion': '警报器支架腐蚀', 'rule.device_offline': '设备离线',
  'rule.low_battery': '电量低', 'rule.sensor_fault': '传感器故障', 'rule.sensor_stuck': '读数卡滞', 'rule.inspection_due': '检验到期',
  'rule.mount_corrosion_rate': '警报器支架腐蚀速率超限', 'rule.siren_test_silent': '试鸣未响应', 'rule.commissioning_overdue': '逾期未投运',
  'rule.site_offline': '站点设备成批离线',
  'kind.gas_detector': '可燃气体探测器', 'kind.smoke_detector': '感烟感温探测器', 'kind.siren_mount': '防空警报器支架',
  'health.online': '在线', 'health.offline': '离线', 'health.stale': '数据滞后', 'health.low_battery': '电量低',
  'health.stuck': '读数卡滞', 'health.faulted': '故障', 'health.clock_skew': '时钟偏差', 'health.never_reported': '从未上报',
  'health.not_in_inventory': '不在清单中',
  'rule.commissioning_overdue': '安装后未上线',
  'metric.gas_lel': '燃气浓度', 'metric.valve_closed': '切断阀', 'metric.temp_c': '温度', 'metric.smoke_db_m': '烟雾浓度',
  'metric.co_ppm': '一氧化碳', 'metric.tilt_deg': '倾斜角', 'metric.vibration_mg': '振动', 'metric.corrosion_um': '腐蚀深度',
  'metric.section_loss_pct': '截面损失', 'metric.battery_v': '电池电压', 'metric.rssi_dbm': '信号强度',
};

const en = {
  'app.title': 'City Safety Operations', 'app.subtitle': 'one network, every problem closed',
  'nav.ops': 'Operations centre', 'nav.map': 'City map', 'nav.health': 'Sensor health', 'nav.maintenance': 'Maintenance',
  'map.title': 'City map', 'map.fit': 'All sites', 'map.tiles': 'Tile URL', 'map.apply': 'Apply', 'map.datum': 'Datum of the tiles',
  'map.datum.wgs84': 'WGS-84 tiles', 'map.datum.gcj02': 'GCJ-02 tiles (Chinese maps)', 'map.noTiles': 'no base map · WGS-84',
  'map.noIncident': 'no active incident', 'map.healthRing': 'ring: device health not OK',
  'map.datumNote': 'Inventory positions are WGS-84 (GPS); converted when drawn over GCJ-02 tiles.',
  'map.empty': 'No device has a position: fill the inventory columns lat, lon (WGS-84) and import it.',
  'map.count': '{sites} sites · {devices} devices placed · {unplaced} without a position', 'map.devices': '{n} devices',
  'common.system': 'system',
  'note.now': 'now {severity}', 'note.since': 'condition since {at}', 'note.command': 'command sent: {cmd} {id}',
  'note.flapping': 'opening and clearing repeatedly; flips are held back until it is quiet', 'note.escalated': 'escalation level {n}',
  'cmd.close_valve': 'close the valve', 'cmd.self_test': 'self test', 'cmd.silence': 'silence', 'cmd.set_interval': 'set interval',
  'live.connecting': 'connecting', 'live.live': 'live', 'live.reconnecting': 'reconnecting', 'live.offline': 'disconnected',
  'sound.on': 'Sound: on', 'sound.off': 'Sound: off',
  'auth.title': 'Sign in', 'auth.hint': 'This gateway needs an API token. Enter the token your administrator gave you.',
  'auth.token': 'API token', 'auth.submit': 'Sign in', 'auth.logout': 'Log out', 'auth.wrong': 'Token not accepted; try again.',
  'auth.forbidden': 'Your token may not do this.',
  'common.dismiss': 'Dismiss', 'common.cancel': 'Cancel', 'common.confirm': 'Confirm', 'common.all': 'All',
  'common.none': 'none', 'common.loading': 'Loading…', 'common.error': 'Error', 'common.search': 'Search device, site…',
  'common.site': 'Site', 'common.kind': 'Kind', 'common.device': 'Device', 'common.total': 'Total',
  'ops.newCritical': 'New critical incident', 'ops.board': 'Incident board', 'ops.critical': 'Critical, not acknowledged',
  'ops.open': 'Open', 'ops.acknowledged': 'Acknowledged', 'ops.dispatched': 'Dispatched', 'ops.review': 'Awaiting review',
  'ops.filter.active': 'Active', 'ops.filter.unclosed': 'Not closed', 'ops.filter.closed': 'Closed',
  'ops.empty': 'No incidents.', 'ops.col.severity': 'Severity', 'ops.col.incident': 'Incident', 'ops.col.state': 'State',
  'ops.col.value': 'Value / threshold', 'ops.col.opened': 'Opened', 'ops.col.actions': 'Actions',
  'ops.detail': 'Incident', 'ops.history': 'History', 'ops.chart': 'Readings around the trigger', 'ops.noMetric': 'This incident has no metric.',
  'ops.count': 'Signals', 'ops.escalation': 'Escalation', 'ops.flapping': 'flapping, held back', 'ops.crew': 'Crew', 'ops.summary': 'Summary',
  'ops.updated': 'Updated',
  'action.ack': 'Acknowledge', 'action.dispatch': 'Dispatch', 'action.resolve': 'Resolve', 'action.close': 'Close',
  'action.actor': 'Operator', 'action.crew': 'Crew', 'action.note': 'Note', 'action.done': 'Done',
  'action.conflict': 'The state changed; not possible: ',
  'health.title': 'Sensor health', 'health.bySite': 'By site and kind', 'health.devices': 'Devices',
  'health.inspectionDue': 'Inspection due', 'health.col.id': 'Device', 'health.col.health': 'Health',
  'health.col.battery': 'Battery', 'health.col.rssi': 'Signal', 'health.col.lastSeen': 'Last seen', 'health.col.reading': 'Latest reading',
  'health.detail': 'Device', 'health.range': 'Range', 'health.incidents': 'Incidents', 'health.noData': 'No data in this range',
  'health.fw': 'Firmware', 'health.interval': 'Interval', 'health.firstSeen': 'First seen', 'health.location': 'Location',
  'health.installDate': 'Installed', 'health.shown': 'showing', 'health.of': 'of',
  'maint.title': 'Maintenance', 'maint.overdue': 'Overdue', 'maint.due30': 'Due within 30 days', 'maint.later': 'Next due later',
  'maint.fallback': 'The maintenance API is not available: due dates are install date + 12 months (first-seen date where no install date is known).',
  'maint.fromApi': 'From the maintenance API', 'maint.col.task': 'Task', 'maint.col.due': 'Due', 'maint.col.daysLeft': 'Days left',
  'maint.col.crew': 'Crew', 'maint.col.phone': 'Phone', 'maint.col.last': 'Last inspection', 'maint.col.basis': 'Based on',
  'maint.basis.install': 'install date', 'maint.basis.firstSeen': 'first seen', 'maint.nothing': 'Nothing due within 30 days and nothing overdue.',
  'maint.days': 'd', 'maint.daysOver': '{n} d overdue',
  'task.inspection': 'Annual inspection', 'task.calibration': 'Calibration', 'task.cleaning': 'Cleaning', 'task.replacement': 'Replacement', 'task.siren_season': 'Siren season check',
  'range.1h': '1 h', 'range.6h': '6 h', 'range.24h': '24 h', 'range.7d': '7 d', 'range.30d': '30 d',
  'time.justNow': 'just now', 'time.s': '{n} s ago', 'time.m': '{n} min ago', 'time.h': '{n} h ago', 'time.d': '{n} d ago',
  'severity.critical': 'Critical', 'severity.major': 'Major', 'severity.warning': 'Warning', 'severity.info': 'Info',
  'state.open': 'Open', 'state.acknowledged': 'Acknowledged', 'state.dispatched': 'Dispatched', 'state.resolved': 'Resolved',
  'state.cleared': 'Cleared', 'state.closed': 'Closed', 'state.escalated': 'Escalated', 'state.renotified': 'Re-notified',
  'state.updated': 'Updated', 'state.reminder': 'Reminder', 'state.command': 'Command sent', 'state.command_acked': 'Command acked',
  'state.reopened': 'Re-opened', 'state.severity': 'Severity changed', 'state.flapping': 'Flapping', 'state.condition_cleared': 'Condition cleared', 'state.command_unanswered': 'Command unanswered',
  'rule.gas_low': 'Gas level 1', 'rule.gas_high': 'Gas level 2', 'rule.gas_valve_failed': 'Valve failed to close',
  'rule.device_alarm': 'Device alarm', 'rule.smoke': 'Smoke', 'rule.heat': 'Heat', 'rule.fire_confirmed': 'Fire confirmed',
  'rule.mount_tilt': 'Siren mount tilt', 'rule.mount_corrosion': 'Siren mount corrosion', 'rule.device_offline': 'Device offline',
  'rule.low_battery': 'Low battery', 'rule.sensor_fault': 'Sensor fault', 'rule.sensor_stuck': 'Sensor stuck', 'rule.inspection_due': 'Inspection due',
  'rule.mount_corrosion_rate': 'Siren mount corrosion rate', 'rule.siren_test_silent': 'Silent in the siren test', 'rule.commissioning_overdue': 'Commissioning overdue',
  'rule.site_offline': 'Site offline',
  'kind.gas_detector': 'Gas detector', 'kind.smoke_detector': 'Smoke/heat detector', 'kind.siren_mount': 'Siren mount',
  'health.online': 'Online', 'health.offline': 'Offline', 'health.stale': 'Stale', 'health.low_battery': 'Low battery',
  'health.stuck': 'Stuck', 'health.faulted': 'Faulted', 'health.clock_skew': 'Clock skew', 'health.never_reported': 'Never reported',
  'health.not_in_inventory': 'Not in inventory',
  'rule.commissioning_overdue': 'Commissioning overdue',
  'metric.gas_lel': 'Gas', 'metric.valve_closed': 'Valve', 'metric.temp_c': 'Temperature', 'metric.smoke_db_m': 'Smoke',
  'metric.co_ppm': 'CO', 'metric.tilt_deg': 'Tilt', 'metric.vibration_mg': 'Vibration', 'metric.corrosion_um': 'Corrosion',
  'metric.section_loss_pct': 'Section loss', 'metric.battery_v': 'Battery', 'metric.rssi_dbm': 'Signal',
};

const DICTS = { zh, en };

export let lang = localStorage.getItem(LANG_KEY) === 'en' ? 'en' : 'zh';

/// The label for `key` in the current language; `{n}`-style placeholders from `vars`.
export function t(key, vars) {
  let text = DICTS[lang][key] ?? DICTS.zh[key] ?? key;
  if (vars) for (const [k, v] of Object.entries(vars)) text = text.replace(`{${k}}`, v);
  return text;
}

/// Rules, states, kinds, metrics and health: the translated word, or the raw name if unknown.
export const tr = (group, name) => (DICTS[lang][`${group}.${name}`] ?? name);

/// An incident's summary in the current language (SPEC §5 `summary_zh` / `summary_en`;
/// `summary` from gateways that predate them).
export const summaryText = (inc) => (lang === 'zh' ? inc.summary_zh : inc.summary_en) || inc.summary || '';

/// The keys of both languages (a test checks they match).
export const keys = () => ({ zh: Object.keys(zh), en: Object.keys(en) });

export function setLang(next) {
  lang = next === 'en' ? 'en' : 'zh';
  localStorage.setItem(LANG_KEY, lang);
  applyStatic();
}

/// Fills every element marked data-i18n in the static page.
export function applyStatic(root = document) {
  document.documentElement.lang = lang === 'zh' ? 'zh-CN' : 'en';
  for (const el of root.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll('[data-i18n-placeholder]')) el.placeholder = t(el.dataset.i18nPlaceholder);
}
